from tests.unit.config.conftest import fixture_copy  # noqa: F401 - istioctl's files, as the config tests get them
