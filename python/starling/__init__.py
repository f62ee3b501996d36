"""starling from Python: IPython parallel's API over starling's Rust client.

::

    from starling import Client
    rc = Client()                  # the only cluster, Client("connection.json"), Client(cluster="science")
    rc[:].map_sync(lambda x: x * x, range(10))

``Cluster(n=4)`` starts a local cluster from Python; inside IPython, creating a Client
registers ``%px``, ``%%px``, ``%pxresult``, ``%pxconfig`` and ``%autopx``.
"""

from ._serialize import Reference
from ._starling import PROTOCOL_VERSION
from .asyncresult import AsyncMapResult, AsyncResult
from .client import Client
from .cluster import Cluster
from .dependency import Dependency
from .error import CompositeError, RemoteError, SerializationError, StarlingError, TimeoutError
from .view import DirectView, LoadBalancedView, View


def load_ipython_extension(ip):
    """``%load_ext starling``: the magics, on the only cluster there is."""
    from . import magics

    magics.register(ip, None)


__all__ = [
    "PROTOCOL_VERSION",
    "AsyncMapResult",
    "AsyncResult",
    "Client",
    "Cluster",
    "CompositeError",
    "Dependency",
    "DirectView",
    "LoadBalancedView",
    "Reference",
    "RemoteError",
    "SerializationError",
    "StarlingError",
    "TimeoutError",
    "View",
]
