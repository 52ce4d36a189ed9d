"""Fakes of the GPU libraries kiln talks to: ``tensorrt``, ``cuda.bindings.runtime``, ``pynvml``.

They are installed into ``sys.modules`` by tests (``monkeypatch.setitem``) so the
backend's real code runs against them. Each fake records its calls and enforces
the rules the real library documents (see shared/docs/TENSORRT.md): a rule broken
by the code under test is appended to ``violations`` and also fails the call the
way the real library would, so a test fails even where the error is swallowed.
"""
