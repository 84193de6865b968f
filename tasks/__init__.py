"""Example sagas, run by ``sagaq demo`` and the tests, against stand-in external systems."""
