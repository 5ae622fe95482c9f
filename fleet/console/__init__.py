"""The fleet's web console, served by ``quantfleet serve`` under ``/console/``.

``app.py`` owns the routes (pages, JSON data endpoints, the write actions),
``queries.py`` the reads aggregated in the store, ``params.py`` the validation
of every query parameter, ``actions.py`` the writes (each through the rollout
engine or the desired state, audited under the operator's name),
``sessions.py`` the browser login and its CSRF tokens, ``metrics.py`` the
Prometheus series. Templates and the vendored uPlot live beside them.
"""
