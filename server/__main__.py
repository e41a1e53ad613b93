"""python -m server --export-dir DIR [--port 8001] ...: run the training server."""

import logging

import uvicorn

from server.app import create_app
from server.config import parse_args


def main() -> None:
    settings = parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info")


if __name__ == "__main__":
    main()
