"""The root conftest: it only registers tests/support's modules as plugins (pytest reads
`pytest_plugins` here and nowhere else), so that their fixtures and hooks serve every test.

A module is listed after the support modules it imports: pytest rewrites the asserts of a plugin
only when it is marked before its first import.
"""

pytest_plugins = [
    "tests.support.vms",
    "tests.support.console",
    "tests.support.servers",
    "tests.support.etcd",
    "tests.support.releases",
    "tests.support.machine",
    "tests.support.daemon",
    "tests.support.misbehaving_server",
    "tests.support.oci",
    "tests.support.containers",
    "tests.support.e2e",
    "tests.support.fuzzing",
]
