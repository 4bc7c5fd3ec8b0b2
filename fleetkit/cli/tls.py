"""``fleetkit tls``: make a cluster CA and certificates, and show what a certificate contains."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fleetkit.core.tls import ROLES, describe, init_ca, issue


def add_parser(sub) -> None:
    parser = sub.add_parser("tls", help="make and inspect the cluster's certificates")
    commands = parser.add_subparsers(dest="tls_command", metavar="SUBCOMMAND", required=True)

    ca = commands.add_parser("init-ca", help="create a cluster CA (ca.pem and ca-key.pem)")
    ca.add_argument("--dir", required=True, help="directory for ca.pem and ca-key.pem")
    ca.add_argument("--name", default="fleetkit cluster CA", help="common name of the CA")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (default: 3650)")
    ca.add_argument("--force", action="store_true", help="replace an existing CA")

    certificate = commands.add_parser("issue", help="issue a certificate and key signed by the cluster CA")
    certificate.add_argument("--ca-dir", required=True, help="directory with ca.pem and ca-key.pem")
    certificate.add_argument("--name", required=True, help="common name; also the file names NAME.pem and NAME-key.pem")
    certificate.add_argument("--role", required=True, choices=ROLES, help="what the certificate may do")
    certificate.add_argument("--ip", action="append", default=[], help="IP address SAN; repeat for more")
    certificate.add_argument("--dns", action="append", default=[], help="DNS name SAN; repeat for more")
    certificate.add_argument("--out", help="output directory (default: --ca-dir)")
    certificate.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    certificate.add_argument("--force", action="store_true", help="overwrite existing files")

    show = commands.add_parser("show", help="print a certificate's subject, SANs, role and expiry")
    show.add_argument("file", help="PEM certificate")


def run(args) -> int:
    if args.tls_command == "init-ca":
        path = init_ca(Path(args.dir), name=args.name, days=args.days, force=args.force)
        print(f"created the cluster CA {path} and its key {path.parent / 'ca-key.pem'} (mode 0600)")
        return 0
    if args.tls_command == "issue":
        out = Path(args.out or args.ca_dir)
        cert, key = issue(Path(args.ca_dir), out, name=args.name, role=args.role, ips=args.ip, dns=args.dns,
                          days=args.days, force=args.force)
        print(f"issued {cert} and its key {key} (mode 0600), role {args.role}")
        return 0
    info = describe(Path(args.file))
    days = info.days_left()
    if getattr(args, "output", "table") == "json":
        print(json.dumps({
            "subject": info.subject, "issuer": info.issuer, "role": info.role, "dns": list(info.dns_names),
            "ip": list(info.ip_addresses), "not_before": info.not_before.isoformat(),
            "not_after": info.not_after.isoformat(), "days_left": round(days, 1), "ca": info.is_ca,
        }, indent=2))
    else:
        print(f"subject:   {info.subject}")
        print(f"issuer:    {info.issuer}")
        print(f"role:      {info.role or '-'}")
        print(f"dns:       {', '.join(info.dns_names) or '-'}")
        print(f"ip:        {', '.join(info.ip_addresses) or '-'}")
        print(f"valid:     {info.not_before:%Y-%m-%d %H:%M} to {info.not_after:%Y-%m-%d %H:%M} UTC")
        state = "expired" if days < 0 else f"{days:.0f} days left"
        print(f"expiry:    {state}")
    if days < 0:
        print(f"warning: {args.file} expired on {info.not_after:%Y-%m-%d}", file=sys.stderr)
        return 1
    return 0
