"""Credential substitution (SPEC §12), the parts without I/O of the network or the database:

- `placeholders`: the placeholder format, minting and detection;
- `values`: what a credential's value, label and hosts may be, and the preview shown of a value;
- `crypto`: AES-256-GCM at rest with `session.key` and associated data binding a ciphertext to its row;
- `substitute`: the substitution over a request head (headers, `Authorization: Basic`, query
  values), its refusals, and the scrubbing of echoed values from what is recorded.

The API (tables, routes) and the proxy (the live map, the request hook) build on these.
"""
