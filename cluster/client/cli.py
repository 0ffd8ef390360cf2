"""``magi`` command line: generate a video, or run the service in the foreground.

    magi generate --prompt "a cat playing piano" --chunks 3 -o out.mp4
        (no --address: starts an embedded local Ray + Serve with magi-tiny, runs the
        job through gRPC, shuts everything down; --in-process: the same job flow in this
        process, no Ray, no gRPC)
    magi generate --prompt TEXT --prompt-from 2:"the cat sleeps" --address HOST:PORT -o out.mp4
    magi serve [--config ray_serve.yaml] [--host IP]   (local Ray on loopback, or the cluster in RAY_ADDRESS;
        SIGTERM / Ctrl-C drain: new jobs refused, running streams finish, then everything stops)
    magi health --address HOST:PORT
    magi checkpoint verify PATH --config NAME     (exit 1 naming every mismatch)
    magi checkpoint manifest --config NAME [--json]

Exit status: 0 ok, 1 service error (message printed), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import grpc

from cluster.client.progress import ProgressView
from cluster.client.sdk import MagiClient, RetryPolicy, make_request
from cluster.config import ConfigError, ServiceConfig


def _prompt_from(text: str) -> tuple[int, str]:
    chunk, sep, prompt = text.partition(":")
    if not sep or not chunk.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected K:TEXT (K a chunk index), got {text!r}")
    return int(chunk), prompt


def _existing_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magi", description="magi-serve video generation client")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video (streams chunks into the output file)")
    gen.add_argument("--prompt", required=True, help="prompt from chunk 0 on")
    gen.add_argument("--prompt-from", type=_prompt_from, action="append", default=[], metavar="K:TEXT",
                     help="use TEXT from chunk K on (repeatable)")
    cond = gen.add_mutually_exclusive_group()
    cond.add_argument("--image", type=_existing_file, help="conditioning image (image-to-video)")
    cond.add_argument("--prefix-video", type=_existing_file, help="video to continue (video-to-video)")
    gen.add_argument("--chunks", type=int, default=1, help="chunks to generate (24 frames each)")
    gen.add_argument("--steps", type=int, default=0, help="denoising steps per chunk (0 = model default)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=0, help="pixels (0 = model default)")
    gen.add_argument("--width", type=int, default=0, help="pixels (0 = model default)")
    gen.add_argument("--format", choices=["fmp4", "raw"], default="fmp4",
                     help="fmp4: playable MP4; raw: uint8 RGB frames (F, H, W, 3)")
    gen.add_argument("-o", "--output", type=Path, required=True, help="output file (written as chunks arrive)")
    where = gen.add_mutually_exclusive_group()
    where.add_argument("--address", help="HOST:PORT of a running service (default: start a local one)")
    where.add_argument("--in-process", action="store_true",
                       help="run the job in this process (cluster.pipeline, no Ray, no gRPC)")
    gen.add_argument("--config", type=Path, help="service config for the local service (ray_serve.yaml)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    srv = sub.add_parser("serve", help="run the service in the foreground until Ctrl-C")
    srv.add_argument("--config", type=Path, help="ray_serve.yaml or a bare ServiceConfig YAML")
    srv.add_argument("--port", type=int, help="gRPC port (default: the config's grpc_port)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address every listener of the local Ray + Serve binds (default loopback; "
                     "0.0.0.0 = all interfaces)")

    health = sub.add_parser("health", help="grpc.health.v1 Check of a running service")
    health.add_argument("--address", required=True)

    ckpt = sub.add_parser("checkpoint", help="check a DiT checkpoint folder against a model config")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    verify = ckpt_sub.add_parser("verify", help="name every missing/unexpected key and wrong shape")
    verify.add_argument("path", type=Path, help="checkpoint folder (official layout)")
    verify.add_argument("--config", required=True, help="preset name or a reference config.json")
    manifest = ckpt_sub.add_parser("manifest", help="print the expected keys, shapes and dtypes")
    manifest.add_argument("--config", required=True, help="preset name or a reference config.json")
    manifest.add_argument("--json", action="store_true", help="JSON instead of one line per tensor")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": _generate, "serve": _serve, "health": _health, "checkpoint": _checkpoint}
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"magi: config error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"magi: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _load_config(path: Path | None) -> ServiceConfig:
    return ServiceConfig.from_yaml(path) if path else ServiceConfig()


def _generate(args: argparse.Namespace) -> int:
    try:
        request = make_request(
            args.prompt, prompt_from=args.prompt_from, image=args.image, prefix_video=args.prefix_video,
            num_chunks=args.chunks, num_steps=args.steps, seed=args.seed, height=args.height,
            width=args.width, output_format=args.format,
        )
    except ValueError as exc:  # e.g. a seed out of the proto's range
        print(f"magi: {exc}", file=sys.stderr)
        return 2
    if args.in_process:
        return _generate_in_process(args, request)
    with contextlib.ExitStack() as stack:
        address = args.address
        if address is None:
            from cluster.client.local import LocalService  # noqa: PLC0415  (imports ray)

            print("starting a local service (Ray + Serve) ...", file=sys.stderr)
            address = stack.enter_context(LocalService(_load_config(args.config), quiet=True)).address
        client = stack.enter_context(MagiClient(address, retry=RetryPolicy()))
        return _run_job(client, request, args.output, quiet=args.quiet)


def _generate_in_process(args: argparse.Namespace, request) -> int:
    """The job through :class:`cluster.pipeline.local.LocalPipeline` (the service's own job flow)."""
    from cluster.pipeline.local import LocalPipeline  # noqa: PLC0415  (imports torch)
    from stages.errors import InvalidInput  # noqa: PLC0415

    async def run() -> int:
        async with LocalPipeline(_load_config(args.config)) as local:
            view = ProgressView(disable=args.quiet)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            done = None
            with open(args.output, "wb") as f, view:
                async for msg in local.generate(request):
                    if msg.HasField("chunk"):
                        f.write(msg.chunk.data)
                    done = msg.done if msg.HasField("done") else done
                    view.update(msg)
        print(f"wrote {args.output} ({done.total_frames} frames, {done.num_chunks} chunks)")
        print(f"TTFC {done.ttfc_s:.3f} s, TPOC {done.tpoc_s:.3f} s, total {done.total_s:.3f} s")
        return 0

    try:
        return asyncio.run(run())
    except InvalidInput as exc:
        print(f"magi: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # asyncio.run cancelled the job (the pipeline cancels it in the engine)
        print("magi: cancelled", file=sys.stderr)
        return 130


def _run_job(client: MagiClient, request, output: Path, quiet: bool) -> int:
    stream = client.generate(request)
    view = ProgressView(disable=quiet)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(output, "wb") as f, view:
            for msg in stream:
                kind = msg.WhichOneof("event")
                if kind == "chunk":
                    f.write(msg.chunk.data)  # parts arrive in order: appending builds the file
                    f.flush()
                view.update(msg)
    except KeyboardInterrupt:
        try:
            stream.cancel()
        except grpc.RpcError as exc:
            print(f"magi: could not cancel job {stream.job_id} on the service ({exc.code().name}); "
                  "it may still run", file=sys.stderr)
            return 130
        print("magi: cancelled", file=sys.stderr)
        return 130
    done = stream.done
    if done is None:
        print("magi: the stream ended without a Done message", file=sys.stderr)
        return 1
    client_ttfc = (stream.first_chunk_at or time.perf_counter()) - stream.started_at
    print(f"wrote {output} ({done.total_frames} frames, {done.num_chunks} chunks)")
    print(f"TTFC {done.ttfc_s:.3f} s (client-observed {client_ttfc:.3f} s), TPOC {done.tpoc_s:.3f} s, "
          f"total {done.total_s:.3f} s")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from cluster.client.local import LocalService  # noqa: PLC0415  (imports ray)

    cfg = _load_config(args.config)
    service = LocalService(cfg, grpc_port=args.port or cfg.grpc_port, host=args.host)
    with service:
        signals = _StopSignals()  # after ray.init, which replaces SIGTERM / SIGINT handlers
        print(f"magi-serve listening on {args.host}:{service.grpc_port} (gRPC; clients: {service.address}); "
              "Ctrl-C or SIGTERM stops", flush=True)
        name = signals.wait()
        timeout = cfg.deployments.ingress.graceful_shutdown_timeout_s
        print(f"{name}: stopping gracefully (again: stop now)", flush=True)
        service.drain(timeout, say=lambda text: print(text, flush=True), give_up=signals.again)
        print("shutting down Serve and Ray ...", flush=True)
    print("stopped", flush=True)
    return 0


class _StopSignals:
    """SIGTERM / SIGINT handlers: the first asks for a graceful stop, a second one to hurry."""

    def __init__(self):
        self._count, self._name = 0, ""
        self._first = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self._count += 1
        self._name = self._name or signal.Signals(signum).name
        self._first.set()

    def wait(self) -> str:
        """Block until the first signal; returns its name."""
        while not self._first.wait(1.0):
            pass
        return self._name

    def again(self) -> bool:
        return self._count > 1


def _health(args: argparse.Namespace) -> int:
    with MagiClient(args.address) as client:
        print(client.health())
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    from stages.dit import manifest  # noqa: PLC0415  (imports torch)

    if args.checkpoint_command == "verify":
        return manifest.main_verify(args.path, args.config)
    return manifest.main_manifest(args.config, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
