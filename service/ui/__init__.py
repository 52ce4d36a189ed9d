"""The web page for people: engines, builds and live traffic, served at ``/``."""

from service.ui.routes import router

__all__ = ["router"]
