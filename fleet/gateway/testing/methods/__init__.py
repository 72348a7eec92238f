"""The simulator's gateway methods, one module per method family.

A family is a mixin class over `Runs` (the shared core: state, session store, events, runs)
whose handlers register themselves with `@method(name, scope, params=...)` (core.py).
FakeGateway (server.py) lists the families among its bases; its method table, the
`features.methods` of hello-ok and the params checks are built from those registrations, so
adding a family is adding a module here and its class to FakeGateway's bases.
"""
