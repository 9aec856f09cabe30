from lightning_mim.cli import main

if __name__ == "__main__":
    main()
