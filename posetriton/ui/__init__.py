"""``posetriton ui``: a small web page that shows the poses a served model finds, in photos and in a live camera.

The page (plain HTML/JS/CSS in ``static/``, no build step) talks to this app; the app talks to
Triton through the project's asyncio client (:class:`posetriton.client.AsyncPoseClient`). Needs the
``ui`` extra (Starlette, uvicorn, websockets).
"""

from .app import UiSettings, create_app, serve

__all__ = ["UiSettings", "create_app", "serve"]
