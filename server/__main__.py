"""python -m server --export-dir DIR [--port 8001] ...: run the training server."""

import logging
import sys

import uvicorn

from server.app import Server, create_app
from server.engine.example_log import ExampleLogError
from server.engine.exclusive import AlreadyRunning
from server.engine.wiring import Unsupported, attach_engine
from server.settings import parse_args
from weight_mapping.trust import UntrustedExport

log = logging.getLogger("vllm_apollo")


def main() -> None:
    settings = parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The engine first (attach, example log, locks): a refusal is one clear line, exit 2.
    try:
        engine = attach_engine(settings)
    except (AlreadyRunning, ExampleLogError, Unsupported, UntrustedExport) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    app = create_app(settings, build=lambda _: engine)
    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                   log_level="info"), app.state.stopping)
    server.run()
    if not server.started:  # as uvicorn.run: the start-up failed
        sys.exit(3)


if __name__ == "__main__":
    main()
