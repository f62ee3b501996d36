"""IPython magics for starling, as ipyparallel's: ``%px`` / ``%%px``, ``%pxresult``,
``%pxconfig`` and ``%autopx``.

This module owns how IPython hands code to the engines (target strings, the blocking and
output options, the ``%autopx`` mode) and how the engines' outputs are shown in IPython:
``[stdout:0] ...``, ``[stderr:0] ...``, ``Out[0:8]: 5050`` and ``[0:error] ...`` with the
remote traceback. Running the code is ``DirectView.execute``'s work.

``register(ip, client)`` installs the magics on a shell (``Client.__init__`` calls it, so the
newest Client is the one ``%px`` uses); ``%load_ext starling`` calls it with ``client=None``,
and the magics connect with ``Client()`` when first used.
"""

from __future__ import annotations

import re

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .asyncresult import show_outputs, show_streamed
from .error import CompositeError, RemoteError

GROUPINGS = ("engine", "type", "order")


class AlreadyDisplayedError(CompositeError):
    """The error ``%px`` raises when tasks failed: each failure's traceback has been printed
    with the engines' other outputs already, so IPython shows a summary only."""

    def _render_traceback_(self) -> list:
        lines = [f"CompositeError: {self.message} (tracebacks above)"]
        lines += [f"[{e.engine_id}:{e.ename}] {e.evalue}" for e in self.elist[:10]]
        if len(self.elist) > 10:
            lines.append(f"... {len(self.elist) - 10} more exceptions ...")
        return lines


# ---- targets ------------------------------------------------------------------------------


def parse_targets(text: str):
    """A ``--targets`` string as a target spec: ``'all'``, an int (``1``, ``-1``), a list
    (``0,2``, ``[0,2]``, ``[1]``) or a slice of the sorted engine ids (``::2``, ``:-1``)."""
    s = text.strip()
    bracketed = len(s) >= 2 and s[0] in "[(" and s[-1] in "])"
    if bracketed:
        s = s[1:-1].strip()
    try:
        if s == "all" and not bracketed:
            return "all"
        if ":" in s:
            parts = s.split(":")
            if len(parts) > 3:
                raise ValueError
            return slice(*(int(p) if p.strip() else None for p in parts))
        if "," in s or bracketed:
            ids = [int(p) for p in s.split(",") if p.strip()]
            if not ids:
                raise ValueError
            return ids
        return int(s)
    except ValueError:
        raise UsageError(
            f"--targets {text!r}: say 'all', an engine id (1), a list (0,2 or [0,2]) or a slice (::2, :-1)"
        ) from None


def _resolve(client, spec):
    """The engines a target spec means now: a slice is taken of ``client.ids``."""
    if isinstance(spec, slice):
        ids = client.ids[spec]
        if not ids:
            raise UsageError(
                f"the targets {_slice_text(spec)} select no engine; the engines are {client.ids}"
            )
        return ids
    return spec


def _slice_text(s: slice) -> str:
    def part(v):
        return "" if v is None else str(v)

    text = f"{part(s.start)}:{part(s.stop)}"
    return text + (f":{s.step}" if s.step is not None else "")


def _describe(spec) -> str:
    if isinstance(spec, slice):
        return f"[{_slice_text(spec)}]"
    return str(spec)


# ---- showing results ----------------------------------------------------------------------


def stream_outputs(ar, groupby: str = "type") -> None:
    """Prints what the tasks write while they run, as it comes (``[stdout:0] ...``, sent on
    by the engines every 0.2 s), then, once the job is done, the rest of each task's outputs
    and its value or error as a blocking ``%px`` shows them. Tasks quicker than that print
    exactly as without streaming."""
    native = ar._native
    streamed = {}
    seen = 0
    while not native.ready():
        native.wait(_STREAM_POLL)
        pieces = native.streamed(seen)
        seen += len(pieces)
        show_streamed(pieces, streamed)
    show_outputs(ar, groupby, streamed=streamed)


# How often a streaming %px looks for new output (the engines send it every 0.2 s).
_STREAM_POLL = 0.1


def _raise_failures(ar) -> None:
    """Raises ``AlreadyDisplayedError`` if any task of a finished job failed."""
    try:
        ar.get()
    except CompositeError as e:
        if any(x.engine_id is None for x in e.elist):
            raise  # not an engine's error (e.g. a lost connection): nothing of it was shown
        raise AlreadyDisplayedError(e.message, e.elist) from None
    except RemoteError as e:
        if e.engine_id is None:
            raise
        raise AlreadyDisplayedError("one or more exceptions raised in 1 task", [e]) from None


# ---- the magics ---------------------------------------------------------------------------

_OPTIONS_WITH_VALUE = {"--targets", "-t", "--out", "-o", "--group-outputs"}
_FLAGS = {
    "--block",
    "-b",
    "--noblock",
    "-a",
    "--stream",
    "--no-stream",
    "-r",
    "-e",
    "--local",
    "--verbose",
    "--no-verbose",
}


def _split_line(line: str):
    """``%px`` on one line: its leading options, and the code after them."""
    pos = 0
    taken = []
    expects_value = False
    for m in re.finditer(r"\S+", line):
        token = m.group()
        if expects_value:
            expects_value = False
        elif token.split("=", 1)[0] in _OPTIONS_WITH_VALUE and "=" in token:
            pass
        elif token in _OPTIONS_WITH_VALUE:
            expects_value = True
        elif token not in _FLAGS:
            break
        taken.append(token)
        pos = m.end()
    return " ".join(taken), line[pos:].strip()


# How %px and %pxresult show outputs, and where they keep the AsyncResult.
_OUTPUT_OPTIONS = [
    argument(
        "-r",
        dest="groupby",
        action="store_const",
        const="order",
        default="type",
        help="Collate the outputs in order (--group-outputs=order).",
    ),
    argument(
        "-e",
        dest="groupby",
        action="store_const",
        const="engine",
        default="type",
        help="Group the outputs by engine (--group-outputs=engine).",
    ),
    argument(
        "--group-outputs",
        dest="groupby",
        choices=GROUPINGS,
        default="type",
        help="type: all stdout, then stderr, errors, values (the default, as in ipyparallel); engine: every output of engine 0, then of 1, ...; order: as type.",
    ),
    argument(
        "-o",
        "--out",
        dest="out",
        default=None,
        help="Store the AsyncResult in the user namespace under this name.",
    ),
]


def _output_options(f):
    for decorate in reversed([magic_arguments(), *_OUTPUT_OPTIONS]):
        f = decorate(f)
    return f


def _px_options(f):
    for decorate in reversed(
        [
            magic_arguments(),
            argument(
                "--targets",
                "-t",
                default=None,
                help="Which engines: all, an id (1), a list (0,2 or [0,2]) or a slice of the engine ids (::2, :-1). Default: %%pxconfig's.",
            ),
            argument(
                "-b",
                "--block",
                dest="block",
                action="store_const",
                const=True,
                default=None,
                help="Wait for the results and show them (the default).",
            ),
            argument(
                "-a",
                "--noblock",
                dest="block",
                action="store_const",
                const=False,
                help="Return the AsyncResult at once; %%pxresult shows it later.",
            ),
            argument(
                "--stream",
                dest="stream",
                action="store_const",
                const=True,
                default=None,
                help="Show what the engines print while the code runs, as it comes (the default).",
            ),
            argument(
                "--no-stream",
                dest="stream",
                action="store_const",
                const=False,
                help="Show the outputs once every engine has finished.",
            ),
            *_OUTPUT_OPTIONS,
            argument(
                "--local",
                action="store_true",
                help="Also run the code here, in IPython's namespace.",
            ),
            argument(
                "--verbose",
                dest="verbose",
                action="store_const",
                const=True,
                default=None,
                help="Say which engines run the code.",
            ),
            argument(
                "--no-verbose",
                dest="verbose",
                action="store_const",
                const=False,
                help="Do not say it.",
            ),
        ]
    ):
        f = decorate(f)
    return f


@magics_class
class ParallelMagics(Magics):
    """``%px``, ``%%px``, ``%pxresult``, ``%pxconfig`` and ``%autopx`` on one Client."""

    def __init__(self, shell, client=None, suffix: str = ""):
        super().__init__(shell)
        # With a suffix (DirectView.activate), every magic's name has it: %px_even, ...
        self.suffix = suffix
        for kind in ("line", "cell"):
            self.magics[kind] = {name + suffix: m for name, m in self.magics[kind].items()}
        self._client = client
        self.targets = "all"
        self.block = True
        self.stream = True
        self.verbose = False
        self.last_result = None
        self.autopx = False
        self._local_runs = 0

    # ---- the client ----------------------------------------------------------------------

    @property
    def client(self):
        """The Client the magics use: the newest one created, else ``Client()`` on first use."""
        if self._client is None:
            from .client import Client

            try:
                self._client = Client()
            except Exception as e:  # noqa: BLE001 - said as a usage error, with the cause
                raise UsageError(
                    f"%px needs a cluster: {e} (start one with `starling up` or starling.Cluster, then create a Client)"
                ) from e
        if self._client.closed:
            raise UsageError(
                "the Client %px uses is closed; create a new Client, and %px will use it"
            )
        return self._client

    @client.setter
    def client(self, client) -> None:
        self._client = client

    def _view(self, spec):
        client = self.client
        try:
            return client.direct_view(_resolve(client, spec))
        except IndexError as e:
            raise UsageError(str(e)) from None

    # ---- %px -------------------------------------------------------------------------------

    @_px_options
    @line_cell_magic
    def px(self, line="", cell=None):
        """Runs code on the engines: ``%px CODE`` or a ``%%px`` cell.

        Blocking (the default) shows each engine's output as ``[stdout:0] ...``,
        ``[stderr:0] ...`` and ``Out[0:8]: value``, and raises a CompositeError if any
        engine failed; ``--noblock`` returns the AsyncResult, which ``%pxresult`` shows.
        """
        if cell is None:
            options, code = _split_line(line)
        else:
            options, code = line, cell
        args = parse_argstring(self.px, options)
        if not code.strip():
            raise UsageError("%px needs code to run: %px CODE, or a %%px cell")
        return self._run(code, args)

    def _run(self, code: str, args):
        spec = parse_targets(args.targets) if args.targets is not None else self.targets
        block = self.block if args.block is None else args.block
        verbose = self.verbose if args.verbose is None else args.verbose
        view = self._view(spec)
        if verbose:
            print(
                f"{'Parallel' if block else 'Async parallel'} execution on engine(s): {_describe(spec)}"
            )
        ar = view.execute(code, block=False)
        self.last_result = ar
        if args.out:
            self.shell.user_ns[args.out] = ar
        if args.local:
            self._run_locally(code)
        if not block:
            return ar
        stream = self.stream if args.stream is None else args.stream
        if stream:
            stream_outputs(ar, args.groupby)
        else:
            ar.wait()
            show_outputs(ar, args.groupby)
        _raise_failures(ar)
        return None

    def _run_locally(self, code: str) -> None:
        self._local_runs += 1
        try:
            self.shell.run_cell(code, store_history=False)
        finally:
            self._local_runs -= 1

    # ---- %pxresult -------------------------------------------------------------------------

    @_output_options
    @line_magic
    def pxresult(self, line=""):
        """Waits for the last ``%px`` job (e.g. a ``--noblock`` one) and shows its outputs."""
        args = parse_argstring(self.pxresult, line)
        ar = self.last_result
        if ar is None:
            raise UsageError("no %px job yet: run %px --noblock CODE (or %%px --noblock) first")
        if args.out:
            self.shell.user_ns[args.out] = ar
        ar.wait()
        show_outputs(ar, args.groupby)
        _raise_failures(ar)

    # ---- %pxconfig -------------------------------------------------------------------------

    @magic_arguments()
    @argument(
        "--targets",
        "-t",
        default=None,
        help="The engines later %%px run on: all, an id, a list (0,2) or a slice (::2).",
    )
    @argument(
        "--block",
        dest="block",
        action="store_const",
        const=True,
        default=None,
        help="Later %%px wait for their results.",
    )
    @argument(
        "--noblock",
        dest="block",
        action="store_const",
        const=False,
        help="Later %%px return an AsyncResult.",
    )
    @argument(
        "--stream",
        dest="stream",
        action="store_const",
        const=True,
        default=None,
        help="Later %%px show what the engines print while the code runs (the default).",
    )
    @argument(
        "--no-stream",
        dest="stream",
        action="store_const",
        const=False,
        help="Later %%px show the outputs once every engine has finished.",
    )
    @argument(
        "--verbose",
        dest="verbose",
        action="store_const",
        const=True,
        default=None,
        help="Say which engines run each %%px.",
    )
    @argument(
        "--no-verbose", dest="verbose", action="store_const", const=False, help="Do not say it."
    )
    @line_magic
    def pxconfig(self, line=""):
        """Sets the defaults of later ``%px``: targets, blocking, streaming and verbosity."""
        args = parse_argstring(self.pxconfig, line)
        if args.targets is not None:
            spec = parse_targets(args.targets)
            if self._client is not None:
                self._view(spec)  # an engine that does not exist is said now, not at %px
            self.targets = spec
        if args.block is not None:
            self.block = args.block
        if args.stream is not None:
            self.stream = args.stream
        if args.verbose is not None:
            self.verbose = args.verbose

    # ---- %autopx ---------------------------------------------------------------------------

    @line_magic
    def autopx(self, line=""):
        """Toggles a mode in which every cell runs on the engines, as if it began with
        ``%%px``; ``%autopx`` again ends it. Cells that begin with a magic (``%...``) or a
        shell command (``!...``) still run here."""
        self.autopx = not self.autopx
        print(f"%autopx{self.suffix} {'enabled' if self.autopx else 'disabled'}")

    def _autopx_transform(self, lines: list) -> list:
        """The input transformer behind ``%autopx``: a cell becomes a ``%%px`` call."""
        if not self.autopx or self._local_runs:
            return lines
        code = "".join(lines)
        first = code.lstrip()
        if not first or first.startswith("get_ipython()."):
            # Empty, or IPython already made it a magic or shell call: it runs here.
            return lines
        return [f"get_ipython().run_cell_magic('px{self.suffix}', '', {code!r})\n"]


def activate(ip, view, suffix: str = "") -> ParallelMagics:
    """The magics, named with ``suffix``, on ``view``'s engines and with its ``block`` flag
    (``DirectView.activate``); with no suffix, the ones a Client registers."""
    # A class of its own per suffix: IPython keeps one instance per class name.
    name = ParallelMagics.__name__ + suffix
    cls = ParallelMagics if not suffix else type(name, (ParallelMagics,), {})
    magics = _install(ip, name, lambda: cls(ip, None, suffix))
    magics.client = view.client
    magics.targets = view.targets
    magics.block = view.block
    return magics


def register(ip, client=None) -> ParallelMagics:
    """Installs the magics on ``ip`` (once); ``client``, if given, becomes the one they use."""
    magics = _install(ip, ParallelMagics.__name__, lambda: ParallelMagics(ip))
    if client is not None:
        magics.client = client
    return magics


def _install(ip, name: str, make) -> ParallelMagics:
    """The magics IPython knows by class ``name``: made by ``make`` and registered with their
    %autopx transformer the first time (or after this module was reloaded: then the older
    transformer of that class goes)."""
    magics = ip.magics_manager.registry.get(name)
    if not isinstance(magics, ParallelMagics):
        ip.input_transformers_post[:] = [
            t
            for t in ip.input_transformers_post
            if not (
                getattr(t, "__name__", "") == "_autopx_transform"
                and type(getattr(t, "__self__", None)).__name__ == name
            )
        ]
        magics = make()
        ip.register_magics(magics)
        ip.input_transformers_post.append(magics._autopx_transform)
    return magics
