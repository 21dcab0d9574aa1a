"""The benchmark of issue 6: rangefs against aria2c, curl, rclone mount and httpdirfs on an
emulated object store (nginx on 127.0.0.1). Not a test: run ``python -m tests.bench``
(see README.md); pytest does not collect this package."""
