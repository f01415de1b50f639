"""fedlora on Flower: a ServerApp and a ClientApp running fedlora's two protocol halves.

`fedlora.flower.serverapp:app` and `fedlora.flower.clientapp:app` are the components of
the Flower app in `flower-app/`; docs/deploy.md explains how to run them.
"""
