"""`mergeflow receive`: the webhook receiver (push-triggered folds), and starting it from `up`/`serve`.

Only argparse and the standard library are imported at module level.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from mergeflow.cli.stackenv import use_stack_env

if TYPE_CHECKING:
    from mergeflow.services.receiver import Receiver
    from mergeflow.services.stack import Stack


def register(subparsers: Any) -> None:
    """Add `receive` to the `mergeflow` sub-commands."""
    p = subparsers.add_parser(
        "receive",
        help="run the webhook receiver: registry notifications -> checkpoint events (push-triggered folds)",
        description=(
            "Listen on MERGEFLOW_RECEIVER_HOST:PORT (127.0.0.1:8470) for MLflow webhooks (/webhooks/mlflow, HMAC "
            "signed with MERGEFLOW_RECEIVER_MLFLOW_SECRET), Hugging Face Hub webhooks (/webhooks/hub, "
            "X-Webhook-Secret = MERGEFLOW_RECEIVER_HUB_SECRET) and SeaweedFS filer notifications "
            "(/webhooks/seaweedfs, bearer MERGEFLOW_RECEIVER_SEAWEEDFS_TOKEN); with --sqs-queue, also read AWS S3 "
            "event notifications from SQS. Each verified notification emits mergeflow.checkpoint.published for "
            "the new checkpoints of the lineage sources it concerns, like watch. Runs until interrupted."
        ),
    )
    p.add_argument("--host", help="interface (default MERGEFLOW_RECEIVER_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default MERGEFLOW_RECEIVER_PORT, 8470)")
    p.add_argument(
        "--register-mlflow-webhook",
        action="store_true",
        help="create the MLflow webhook for new model versions (a secret is generated under "
        "MERGEFLOW_HOME when MERGEFLOW_RECEIVER_MLFLOW_SECRET is unset)",
    )
    p.add_argument("--sqs-queue", metavar="URL", help="also poll this SQS queue for S3 events")
    p.set_defaults(func=cmd_receive)


def build_receiver(
    host: str | None = None, port: int | None = None, register_mlflow: bool = False
) -> Receiver:
    """A started receiver; with ``register_mlflow``, the MLflow webhook points at it."""
    from pydantic import SecretStr

    from mergeflow.services.receiver import Receiver, ReceiverSettings
    from mergeflow.services.webhook_setup import ensure_mlflow_webhook, local_secret
    from mergeflow.settings import Settings

    settings = ReceiverSettings()
    update: dict[str, Any] = {"host": host or settings.host, "port": port or settings.port}
    if register_mlflow and settings.mlflow_secret is None:
        path = Settings().run_dir / "receiver-mlflow.secret"
        update["mlflow_secret"] = SecretStr(local_secret(path))
    receiver = Receiver(settings.model_copy(update=update)).start()
    secret = receiver.settings.mlflow_secret
    if register_mlflow and secret is not None:
        ensure_mlflow_webhook(f"{receiver.url}/webhooks/mlflow", secret.get_secret_value())
    return receiver


def cmd_receive(args: argparse.Namespace) -> int:
    # pipeline extra: loaded on use, the light CLI runs without it
    from mergeflow.services.receiver import ReceiverSettings, poll_sqs

    use_stack_env()
    receiver = build_receiver(args.host, args.port, args.register_mlflow_webhook)
    print(f"mergeflow receiver on {receiver.url} (GET /health)", flush=True)
    stop = threading.Event()
    queue = args.sqs_queue or ReceiverSettings().sqs_queue_url
    try:
        if queue:
            print(f"reading S3 event notifications from {queue}", flush=True)
            poll_sqs(queue, stop=stop)
        else:
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        receiver.stop()
    return 0


def configured() -> bool:
    """Whether any receiver endpoint has a secret (or an SQS queue) in the environment."""
    from mergeflow.services.receiver import ReceiverSettings

    s = ReceiverSettings()
    return any(x is not None for x in (s.mlflow_secret, s.hub_secret, s.seaweedfs_token))


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((host, port)) != 0


def start_in_thread() -> Receiver | None:
    """For `mergeflow serve`: a receiver in this process when one is configured and none runs."""
    from mergeflow.services.receiver import ReceiverSettings

    s = ReceiverSettings()
    if not configured():
        return None
    if not port_free(s.host, s.port):
        print(f"a receiver already listens on {s.host}:{s.port}; not starting another", flush=True)
        return None
    receiver = build_receiver()
    print(f"webhook receiver on {receiver.url}", flush=True)
    return receiver


def start_service(stack: Stack) -> str:
    """For `mergeflow up --receiver`: the receiver as a managed process that registers the
    MLflow webhook; returns its URL."""
    from mergeflow.services.receiver import ReceiverSettings

    s = ReceiverSettings()
    argv = [sys.executable, "-m", "mergeflow", "receive", "--register-mlflow-webhook"]
    url = f"http://{s.host}:{s.port}"
    spec = stack.command("receiver", argv, health_url=f"{url}/health")
    stack.start_process(spec.model_copy(update={"url": url}))  # shown by `mergeflow status`
    return url
