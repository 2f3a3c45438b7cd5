"""Run the demo shop: ``uv run python -m examples.shop`` (serves on http://127.0.0.1:8000)."""

import uvicorn

if __name__ == "__main__":
    uvicorn.run("examples.shop.app:app", host="127.0.0.1", port=8000)
