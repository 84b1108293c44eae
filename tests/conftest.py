pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.kinguin",
    "tests.fixtures.payments_mail",
    "tests.fixtures.s3",
    "tests.fixtures.webhook",
    "tests.fixtures.world",
]


def pytest_collection_modifyitems(items):
    # The "definitions load" test runs first: when the code location does not load, nothing else can pass.
    items.sort(key=lambda item: item.path.name != "test_definitions.py")
