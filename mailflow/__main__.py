from mailflow.cli import main; main()  # noqa: E702
