"""Proxy: HTTP and SOCKS5 listeners, rules in memory, holds, tunnels."""
