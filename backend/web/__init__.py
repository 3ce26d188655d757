"""The HTTP face: Label Studio's ML-backend protocol on FastAPI (`app.create_app`), middleware.

Nothing is imported here: `backend.web.middleware` is read by the CLI and doctor, which must
not load the model stack."""
