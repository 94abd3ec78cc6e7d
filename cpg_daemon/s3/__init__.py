"""The S3 seam: everything that talks to the object store.

- ``store``: ``ObjectStore``, the control plane (HeadObject, listings, multipart
  create/complete/abort, ListParts, DeleteObject) on an aiobotocore client, and the
  ``Storage`` protocol the engine uses.
- ``dataplane``: the ``DataPlane`` interface for the requests that carry bytes
  (PutObject, UploadPart), botocore's implementation, and the routing policy
  (``choose_data_plane`` at connect, ``route`` per request).
- ``crt``: the CRT implementation of ``DataPlane`` (awscrt's native S3 client).
- ``errors``: S3 error replies and botocore exceptions -> cpg-daemon's error classes.
- ``credentials``: where the keys come from, and their renewal.
- ``_botocore``: the only module touching private botocore/aiobotocore internals.
"""
