"""The folder put on one peer process's PYTHONPATH: its sitecustomize.py is a test-only fault.

A package only so that mypy tells this sitecustomize from tests/soak/partial_agreement/'s.
"""
