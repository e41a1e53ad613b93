"""python -m server --export-dir DIR [--port 8001] ...: run the training server."""

import logging

import uvicorn

from server.app import create_app
from server.settings import parse_args


def main() -> None:
    settings = parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.api_key and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("vllm_apollo").warning(
            "listening on %s without --api-key: anyone who reaches it can retrain the model",
            settings.host)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info")


if __name__ == "__main__":
    main()
