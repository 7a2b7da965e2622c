import sys

from greyproxy.cli import main

main(["run", "proxy", *sys.argv[1:]])
