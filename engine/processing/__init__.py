"""Requests in and answers out: image preprocessing, input bounds, the input and output processors."""
