"""Plain helpers shared by the tests (no fixtures: those live in ``conftest.py`` and ``fixtures_*.py``).

``tests/`` is on ``sys.path`` (``pythonpath`` in ``[tool.pytest.ini_options]``), so tests import
these as ``from helpers.models import tiny_state``.

- :mod:`helpers.models`: tiny synthetic models, fake fine-tunes, an in-memory fold.
- :mod:`helpers.cli`: run the ``mergeflow`` CLI in a subprocess; what an in-process call
  returned; start ``mergeflow serve`` and wait until it serves.
- :mod:`helpers.hub_standin`: a local stand-in for the Hugging Face Hub HTTP API.
"""
