"""The model pages: what to show (`views`, `report`, `counters`, `examples`) and how (`render`).

The routes live in `service/routes/ui.py`, the templates in `templates/`, and the pages' one
script and stylesheet in `service/static/`. No front-end build step: plain server-rendered
HTML with a little JavaScript, nothing loaded from another host.
"""
