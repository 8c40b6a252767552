"""The public archive: a static, redacted site written from the store.

The shape follows Pelican: build the whole public context first (`context`), render every
page from it (`render`, `feeds`, `charts`), then hand every file to one writer (`writer`) that
refuses to write a file twice, refuses to write a private value at all, and only touches files
whose content changed. `mailflow.archive.build.build` is the one entry point; the CLI and the
daemon call it. (Nothing is imported here, so `mailflow.archive.build` stays the module.)
"""
