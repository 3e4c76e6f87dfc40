"""certkv's gRPC front end: the only package that touches grpc and protobuf.

cli.py builds the configs from flags; app.py runs the grpc.aio server (health, reflection, warm-up, drain);
service.py implements certkv.v1.Inference; async_engine.py runs the engine on its own thread and bridges outputs to
RPC coroutines; convert.py maps protobuf <-> engine types and engine errors -> gRPC statuses; client.py is the CLI
client. Generated stubs live in server/pb (made by `make proto`, never committed).
"""
