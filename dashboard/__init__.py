"""A read-only web dashboard over one peer's ledger.

``dashboard --ledger URL`` (see :mod:`dashboard.__main__`) serves it;
:func:`dashboard.app.create_app` builds the Dash app without a server;
:mod:`dashboard.data` turns ledger rows into the tables it shows;
:mod:`dashboard.source` opens the ledger read-only.
"""
