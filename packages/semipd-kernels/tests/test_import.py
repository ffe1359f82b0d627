import semipd_kernels


def test_package_imports() -> None:
    assert semipd_kernels.__name__ == "semipd_kernels"
