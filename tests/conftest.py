pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.kinguin",
    "tests.fixtures.payments_mail",
    "tests.fixtures.s3",
    "tests.fixtures.world",
]
