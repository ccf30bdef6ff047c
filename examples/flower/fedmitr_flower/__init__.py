"""fedmitr as a Flower app: real clients train once on their own shard; the server runs fedmitr's methods.

``client_app.app`` is the ClientApp (one per SuperNode), ``server_app.app`` the ServerApp. What
travels between them is described in :mod:`fedmitr_flower.task`.
"""
