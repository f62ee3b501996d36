"""Creates the network the end-to-end specs name, in LocalStack: a VPC 127.0.0.0/16 and one
/24 subnet per test (instances get 127.0.N.4, .5, ... on loopback). LocalStack's `_custom_id_`
tag gives them the fixed ids that templates/localstack.yaml and the tests use."""

import boto3

ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url="http://127.0.0.1:4566")
VPC = "vpc-00000000057a41196"


def tagged(kind, ident):
    return [{"ResourceType": kind, "Tags": [{"Key": "_custom_id_", "Value": ident}]}]


ec2.create_vpc(CidrBlock="127.0.0.0/16", TagSpecifications=tagged("vpc", VPC))
for n in range(0, 16):
    ec2.create_subnet(
        VpcId=VPC,
        CidrBlock=f"127.0.{n}.0/24",
        TagSpecifications=tagged("subnet", f"subnet-000000000057a41{n:02x}"),
    )
print("network ready: vpc", VPC, "with subnets 127.0.0.0/24 .. 127.0.15.0/24")
