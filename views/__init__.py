"""The customer-facing pages: every /pay/{token} and /verify/{token} route (views/pages.py), the
errors they raise and the handlers that render them (views/errors.py)."""
