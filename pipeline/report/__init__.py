"""Reads finished artifacts and writes the report and figures; never calls a stage."""
