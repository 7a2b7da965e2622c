import sys

from greyproxy.cli import main

main(["run", "api", *sys.argv[1:]])
