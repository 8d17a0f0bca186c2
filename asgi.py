"""ASGI entry point: ``uvicorn asgi:app``. Settings come from the environment."""

from server.app import create_app
from server.settings import Settings

app = create_app(Settings.from_env())
