"""The ``kubetune`` command line: files, jobs and models against any kubetune base URL."""
