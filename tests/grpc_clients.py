"""Calls both binaries' Unix-socket CSI endpoints through gRPC C-core
(Python grpcio), whose default :authority for a unix: target is the socket
path, as operators' tools do. Raw bytes in and out: an empty request message
is zero bytes, and the answers are checked for the fields they must hold.

Usage: grpc_clients.py CONTROLLER_SOCKET NODE_SOCKET DRIVER_NAME NODE_ID
"""
import sys

import grpc

controller_socket, node_socket, driver, node_id = sys.argv[1:5]
passed = failed = 0


def call(socket, method):
    # No options: the channel's authority is C-core's default for the target.
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        rpc = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        return rpc(b"", timeout=10)


def check(what, socket, method, must_hold):
    global passed, failed
    try:
        answer = call(socket, method)
    except grpc.RpcError as e:
        failed += 1
        print(f"FAILED: {what}: {e.code()} {e.details()}")
        return
    missing = [m for m in must_hold if m not in answer]
    if missing:
        failed += 1
        print(f"FAILED: {what}: answer {answer!r} lacks {missing!r}")
    else:
        passed += 1
        print(f"ok: {what} ({len(answer)} bytes)")


for name, socket in (("controller", controller_socket), ("node", node_socket)):
    check(f"{name} GetPluginInfo", socket, "/csi.v1.Identity/GetPluginInfo", [driver.encode()])
    check(f"{name} Probe", socket, "/csi.v1.Identity/Probe", [])
    check(f"{name} GetPluginCapabilities", socket, "/csi.v1.Identity/GetPluginCapabilities", [])
check("controller ControllerGetCapabilities", controller_socket,
      "/csi.v1.Controller/ControllerGetCapabilities", [])
check("controller ListVolumes", controller_socket, "/csi.v1.Controller/ListVolumes", [])
check("node NodeGetInfo", node_socket, "/csi.v1.Node/NodeGetInfo", [node_id.encode()])
check("node NodeGetCapabilities", node_socket, "/csi.v1.Node/NodeGetCapabilities", [])
print(f"grpc-clients: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
