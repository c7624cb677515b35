"""The operator's command line, `patchserve admin …`: the admin HTTP API as nouns and verbs.

It talks to a running gateway over HTTP only (client.py), the way an operator's laptop would, and
never imports the API or the store: what it can do is exactly what the admin API allows.
"""
