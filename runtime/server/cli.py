"""`editrt serve`: options and the uvicorn launch (editrt/cli.py calls configure_parser and run).

`editrt serve --ray` runs the same app as a Ray Serve deployment instead (ray_deployment.py): one
pipeline pair per replica, sessions routed to the replica holding them. It starts a local Ray on
this machine, or joins the cluster at --ray-address / $RAY_ADDRESS, serves until interrupted
(Ctrl-C or SIGTERM), then shuts Ray Serve down (on a joined cluster: deletes only its application).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import tempfile
import time

from editrt.errors import EditError, InputError
from editrt.models.common import DTYPE_ALIASES, DTYPES
from editrt.runtime.server.access_log import RedactQuery
from editrt.runtime.server.loading import ServeConfig, load_pipelines, parse_editors
from editrt.runtime.server.settings import Settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="weights directory, or 'tiny' / 'full' for cached random weights "
                   "(default: $EDITRT_WEIGHTS)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="torch", help="torch (default), onnxruntime or tensorrt")
    p.add_argument("--engines", metavar="DIR", help="the folder `editrt export` wrote (onnxruntime, tensorrt)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", type=lambda text: DTYPE_ALIASES.get(text, text), choices=tuple(DTYPES), metavar="DTYPE",
                   help=f"{', '.join(DTYPES)} or {', '.join(DTYPE_ALIASES)} (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--editors", default="reposition,elements", help="which pipelines to load (default both)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every endpoint and the WebSocket "
                   "(default: $EDITRT_TOKEN; none = no authentication)")
    p.add_argument("--max-sessions", type=int, default=16, help="open sessions before the least recently used closes")
    p.add_argument("--session-ttl", type=float, default=900.0, help="seconds an idle session lives (default 900)")
    p.add_argument("--session-bytes", type=int, default=1 << 30, help="byte budget of all sessions (default 1 GiB)")
    p.add_argument("--max-upload-bytes", type=int, default=16 << 20, help="largest request body (default 16 MiB)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image, width x height")
    p.add_argument("--max-steps", type=int, default=100, help="most denoising steps a request may ask for")
    p.add_argument("--steps", type=int, default=20, help="session final steps (default 20)")
    p.add_argument("--preview-steps", type=int, default=4, help="session preview steps (default 4)")
    p.add_argument("--resolution", type=int, help="session processing short side, multiple of 8 (default: the model's)")
    p.add_argument("--queue-size", type=int, default=32, help="jobs waiting per pipeline before 503 (default 32)")
    p.add_argument("--no-warmup", action="store_true", help="ready at once, without the warm-up request")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--allowed-host", action="append", metavar="NAME", help="a Host name requests may use "
                   "(repeatable; default: loopback names without --token, the --host name too, any with --token)")
    p.add_argument("--allowed-origin", action="append", metavar="ORIGIN", help="a web page origin, "
                   "scheme://host[:port], whose pages may call this server from a browser besides its own (repeatable; "
                   "default: only pages this server serves)")
    p.add_argument("--max-resolution", type=int, default=2048, help="largest processing short side a request may "
                   "ask for (default 2048)")
    p.add_argument("--max-work-pixels", type=int, default=2048 * 2048, help="largest processing canvas, H x W, "
                   "of any denoising pass or partition (default 2048x2048)")
    p.add_argument("--max-pixel-steps", type=int, default=1024 * 1024 * 50, help="most canvas pixels x steps of "
                   "one denoising pass (default 1024x1024 x 50)")
    p.add_argument("--max-elements", type=int, default=4096, help="most elements in an elements blob")
    p.add_argument("--max-elements-bytes", type=int, default=64 << 20, help="largest elements npz, uncompressed "
                   "(default 64 MiB)")
    p.add_argument("--max-region-pixels", type=int, default=64 << 20, help="most element-region pixels one "
                   "request's edits may draw (default 64 Mi)")
    p.add_argument("--ws-per-session", type=int, default=4, help="drag WebSockets open on one session (default 4)")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a request body may take to arrive "
                   "(default 30)")
    ray = p.add_argument_group("Ray Serve (--ray)")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment: one pipeline pair per "
                     "replica, each session on the replica that holds it")
    ray.add_argument("--ray-address", metavar="ADDRESS", help="join this Ray cluster, e.g. 'auto' after "
                     "`ray start --head` (default: $RAY_ADDRESS; none: start a local Ray on this machine)")
    ray.add_argument("--replicas", type=int, help="replicas at start, the fixed count without autoscaling (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, help="GPUs per replica; fractions share one "
                     "(default: 1 where this machine has CUDA and --device is not cpu, else 0)")
    ray.add_argument("--cpus-per-replica", type=float, help="CPUs per replica, also its PyTorch threads (default 1)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (giving it or --max-replicas "
                     "turns autoscaling on)")
    ray.add_argument("--max-replicas", type=int, help="autoscaling: most replicas")
    ray.add_argument("--target-ongoing-requests", type=float, help="autoscaling: ongoing requests per replica to "
                     "aim at; an open drag WebSocket counts as one (default 2)")
    ray.add_argument("--sessions-per-replica", type=int, help="open sessions a replica holds before its least "
                     "recently used closes; replaces --max-sessions (default 8)")


COST_OPTIONS = ("max_resolution", "max_work_pixels", "max_pixel_steps", "max_elements", "max_elements_bytes",
                "max_region_pixels")
RAY_OPTIONS = ("ray_address", "replicas", "gpus_per_replica", "cpus_per_replica", "min_replicas", "max_replicas",
               "target_ongoing_requests", "sessions_per_replica")


def settings_from(args) -> Settings:
    for name in ("max_sessions", "max_upload_bytes", "max_pixels", "max_steps", "steps", "preview_steps",
                 "queue_size", "port", *COST_OPTIONS, "ws_per_session"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise InputError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(args, name)}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise InputError(f"--resolution {args.resolution}: expected a positive multiple of 8")
    if args.session_ttl <= 0 or args.session_bytes < 1:
        raise InputError("--session-ttl / --session-bytes: expected positive numbers")
    return Settings.from_env(token=args.token or None, max_sessions=args.max_sessions, session_ttl_s=args.session_ttl,
                             session_bytes=args.session_bytes, max_upload_bytes=args.max_upload_bytes,
                             max_pixels=args.max_pixels, max_steps=args.max_steps, final_steps=args.steps,
                             preview_steps=args.preview_steps, queue_size=args.queue_size, resolution=args.resolution,
                             warmup=not args.no_warmup, weights=str(args.weights or os.environ.get("EDITRT_WEIGHTS", "")),
                             ws_per_session=args.ws_per_session, read_timeout_s=args.read_timeout,
                             allowed_hosts=_allowed_hosts(args), allowed_origins=_allowed_origins(args), **{name: getattr(args, name) for name in COST_OPTIONS})


def _allowed_hosts(args) -> tuple[str, ...] | None:
    """The Host names requests may use: --allowed-host; else, without a token, the loopback names and the
    --host name (a wildcard bind needs --allowed-host); with a token, any (None)."""
    from editrt.runtime.server.app import LOOPBACK_NAMES

    if args.allowed_host:
        return tuple(name.lower() for name in args.allowed_host)
    if args.token or os.environ.get("EDITRT_TOKEN"):
        return None
    return LOOPBACK_NAMES + (() if args.host in ("0.0.0.0", "::") else (args.host.lower(),))


ORIGIN = re.compile(r"(https?)://([^/?#@\s]+)")


def _allowed_origins(args) -> tuple[str, ...]:
    """--allowed-origin values as a browser sends its Origin header: lower-case scheme://host[:port], no path."""
    origins = []
    for given in args.allowed_origin or ():
        match = ORIGIN.fullmatch(given.strip().rstrip("/").lower())
        if match is None:
            raise InputError(f"--allowed-origin {given!r}: expected scheme://host[:port] with scheme http or https "
                             "and no path (e.g. https://editor.example.com)", field="allowed_origin")
        origins.append(match.group(0))
    return tuple(origins)


def serve_config(args, settings: Settings) -> ServeConfig:
    """The pipelines `editrt serve` loads, from its options, resolved (cached random weights made once);
    the weights directory is shown by /readyz."""
    config = ServeConfig(weights=args.weights, editors=parse_editors(args.editors), device=args.device,
                         dtype=args.dtype, backend=args.backend, engines=args.engines, queue_size=settings.queue_size,
                         quiet=args.quiet).resolved()
    settings.weights = config.weights
    return config


def run(args) -> int:
    """Load, build the app, serve until interrupted. Bad options raise InputError (the CLI prints one line)."""
    settings = settings_from(args)
    given = [name for name in RAY_OPTIONS if getattr(args, name, None) is not None]
    if not args.ray and given:
        raise InputError(f"--{given[0].replace('_', '-')}: only with --ray")
    if args.host not in LOOPBACK and not settings.token:
        print(f"editrt: warning: serving on {args.host} without --token: anyone who can reach it can use it",
              file=sys.stderr)
    if args.ray:
        return run_ray(args, settings)
    import uvicorn

    from editrt.runtime.server.app import create_app

    app = create_app(**load_pipelines(serve_config(args, settings)), settings=settings)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, args.quiet, settings)).run()
    return 0


def uvicorn_config(app, host: str, port: int, quiet: bool, settings: Settings):
    """uvicorn's config for `editrt serve`: its access log redacts query strings (a ?token= never reaches a
    log line), in-flight requests get 5 s at shutdown (then 503)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info", access_log=not quiet,
                            ws_max_size=settings.max_upload_bytes, timeout_graceful_shutdown=5)
    access = logging.getLogger("uvicorn.access")  # configured by Config: the filter goes on after it
    if not any(isinstance(f, RedactQuery) for f in access.filters):
        access.addFilter(RedactQuery())
    return config


def ray_options(args):
    """RayOptions from the command line, checked (one-line InputError)."""
    from editrt.runtime.server.ray_deployment import RayOptions

    values = {name: getattr(args, name) for name in RAY_OPTIONS[1:] if getattr(args, name) is not None}
    if "gpus_per_replica" not in values:
        import torch

        values["gpus_per_replica"] = 1.0 if torch.cuda.is_available() and args.device != "cpu" else 0.0
    if values.get("min_replicas") is not None and "replicas" not in values:
        values["replicas"] = max(1, values["min_replicas"])
    return RayOptions(**values).check()


def replica_config(args, settings: Settings, options) -> ServeConfig:
    """What each replica loads, checked and resolved here first. A replica sees only the GPUs Ray gives it: its
    device is `cuda` (= cuda:0, its own GPU) or `cpu`."""
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:0)?", args.device):
        raise InputError(f"--device {args.device}: with --ray, expected cpu or cuda (each replica sees only the GPUs "
                         "Ray gives it, as cuda:0)")
    if (args.device or "").startswith("cuda") and not options.gpus_per_replica:
        raise InputError(f"--device {args.device}: a replica sees no GPU with --gpus-per-replica 0")
    return dataclasses.replace(serve_config(args, settings), quiet=True)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


# Ray (2.x, checked on 2.60) resolves a local node's IP to the machine's routable address, even when told
# `_node_ip_address="127.0.0.1"` (services.resolve_ip_for_localhost replaces loopback names), and its GCS,
# raylet and agents then listen on all interfaces. Only with clusters disabled (ray_constants.ENABLE_RAY_CLUSTER,
# this variable, the default on macOS and Windows) is the node IP 127.0.0.1, and then every Ray process
# (GCS, raylet, dashboard and runtime-env agents, workers, the driver) binds 127.0.0.1. Ray reads it when it
# is first imported, in this process and in every process it starts.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _local_ray_on_loopback() -> bool:
    """Make the local Ray this command starts listen on 127.0.0.1 only; False when it is too late (ray was
    imported in this process before)."""
    name, value = next(iter(LOCAL_RAY_ENV.items()))
    took = "ray" not in sys.modules or os.environ.get(name) == value
    os.environ.update(LOCAL_RAY_ENV)
    return took


def run_ray(args, settings: Settings) -> int:
    """Deploy on Ray Serve (a local Ray, or the cluster at --ray-address), serve until Ctrl-C / SIGTERM,
    then shut Ray Serve down (a joined cluster keeps running: only this application is deleted).
    A local Ray's own processes listen on 127.0.0.1 only (its control plane has no authentication);
    the HTTP proxy listens on --host. A cluster is started by its operator (`ray start`) and joined
    with --ray-address."""
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    loopback = address is None and _local_ray_on_loopback()  # before anything imports ray
    options = ray_options(args)
    config = replica_config(args, settings, options)
    if address is None and not loopback:
        raise EditError("--ray: Ray was imported before `editrt serve` could bind its local Ray to 127.0.0.1; run "
                        "`editrt serve --ray` in a fresh process, or start Ray yourself and pass --ray-address")
    import ray
    from ray import serve

    from editrt.runtime.server.ray_deployment import build_app

    ray.init(address=address, include_dashboard=False, dashboard_host="127.0.0.1",
             logging_level="WARNING" if args.quiet else "INFO", log_to_driver=not args.quiet)
    if address is None and ray.util.get_node_ip_address() != "127.0.0.1":  # never serve an open control plane
        ray.shutdown()
        raise EditError(f"--ray: the local Ray took node address {ray.util.get_node_ip_address()}, not 127.0.0.1; "
                        "start Ray yourself and pass --ray-address")
    # One directory for the replicas' Prometheus counters and histograms, so any replica's /metrics reports
    # their sum (metrics.py); the operator's own PROMETHEUS_MULTIPROC_DIR wins.
    metrics_dir = None if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else tempfile.TemporaryDirectory(
        prefix="editrt-metrics-")
    options.metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or metrics_dir.name
    # After ray.init (it installs its own SIGTERM handler): both signals end the wait below, and the
    # `finally` shuts Serve down. SIGINT explicitly too: a shell starts background jobs with it ignored.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _interrupted)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options, config, settings), name=options.name, route_prefix="/")
        scaling = (f"{options.replicas} replicas, autoscaling {options.low}-"
                   f"{options.max_replicas or options.replicas}" if options.autoscaling else f"{options.replicas} replicas")
        print(f"editrt: serving on http://{args.host}:{args.port} with Ray Serve ({scaling}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("editrt: stopping Ray Serve", file=sys.stderr, flush=True)
    finally:
        try:
            if address:
                serve.delete(options.name)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
            if metrics_dir is not None:
                metrics_dir.cleanup()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="editrt serve", description="The editing server and its browser editor.")
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except EditError as e:
        print(f"editrt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
