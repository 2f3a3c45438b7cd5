"""Small ASGI apps the e2e tests serve with a real uvicorn in a subprocess."""
