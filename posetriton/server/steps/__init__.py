"""Triton Python-backend models. Each module holds one ``TritonPythonModel``; the model.py files
in the generated repository import them, so the logic lives here once."""
