"""The web app (`layout-retouch serve`): a Gradio page over `LayoutRetouchPipeline` (install the `web` extra).

`engine.py` holds what the page does (requests, the generation queue, Stop, the PNGs it writes) without
importing Gradio, so it is tested without a browser; `app.py` lays the page out over it.
"""
