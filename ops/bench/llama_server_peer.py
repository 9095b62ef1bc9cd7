"""llama.cpp's own server (`llama-server`, from the `xllamacpp` wheel), the peer of ops/bench/concurrency.py.

Run by that benchmark with the Python of a separate virtualenv that has xllamacpp (it is not one
of localq's dependencies), so this file imports nothing but xllamacpp and the standard library:

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install xllamacpp
    /tmp/peers/bin/python ops/bench/llama_server_peer.py --model M.gguf --port 8090 --parallel 4 --threads 2

`xllamacpp.Server` runs llama.cpp's C++ server (continuous batching over `n_parallel` slots) on
its own threads; this process only keeps it alive until it is terminated.
"""

from __future__ import annotations

import argparse
import signal
import threading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=4, help="slots (sequences decoded together)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048, help="context of each slot, in tokens")
    parser.add_argument("--alias", default="peer")
    args = parser.parse_args()

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.context * args.parallel  # llama-server splits n_ctx among its slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.cont_batching = True
    server = xllamacpp.Server(params)
    print(f"llama-server ready on {server.listening_address}", flush=True)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    del server


if __name__ == "__main__":
    main()
