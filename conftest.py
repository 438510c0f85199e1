"""Test selection: ``python -m pytest`` is the quick check (unit and small end-to-end tests); ``--full``
adds the slow set (training runs, the notebooks through nbval, the browser test), as CI runs it."""



def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the slow tests and the notebooks (nbval)")


def pytest_ignore_collect(collection_path, config):
    if collection_path.suffix == ".ipynb" and not config.getoption("--full"):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
