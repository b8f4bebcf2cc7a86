pytest_plugins = ["tests.fix_pg", "tests.fix_s3", "tests.fix_faults", "tests.fix_warehouse"]
