"""Prefect flows and the `reconlab` CLI. Stage logic lives in `pipeline`; this package only wires it up."""
