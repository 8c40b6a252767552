"""`mailflow route` and `mailflow category list`: fault-report routing, as an admin sees it.

Routing is data (rules/categories.toml, areas.geojson), so an admin needs to ask "where would
a pothole at this point go, and why?" without sending a report: `route` answers with every
step of the decision (mailflow.core.routing does the work). Exit codes let scripts check a
whole list of points: 0 an authority was found, 1 none (not covered, nobody handles the tier,
or ambiguous), 2 a usage error or an unknown category.

cli.py registers these at its end (`register(cli)`). Nothing from `mailflow.cli` is imported
at the top here, so either module may be imported first.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from mailflow.cli import Ctx
    from mailflow.core.routing import Route

console = Console()
err_console = Console(stderr=True)
pass_ctx = click.pass_obj   # the `Ctx` that the `mailflow` group puts on the context
EX_FOUND, EX_NONE, EX_USAGE = 0, 1, 2
NO_RULES = ("this site has no fault-report rules (rules/categories.toml and "
            "rules/areas.geojson): it takes no fault reports")


def print_json(data: Any) -> None:
    from mailflow.cli import print_json
    print_json(data)


def _say(text: str, style: str = "") -> None:
    """One line per fact, never cut at 80 columns, so the output can be grepped."""
    console.print(escape(text), style=style, highlight=False, soft_wrap=True)


def _usage_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(EX_USAGE)


def route_json(ctx: Ctx, route: Route, lat: float, lon: float) -> dict[str, Any]:
    authority = ctx.site.rules.authorities.get(route.authority) if route.authority else None
    return {
        "point": {"lat": lat, "lon": lon},
        "category": route.category,
        "tier": route.tier,
        "covered": route.covered,
        "ambiguous": route.ambiguous,
        "authority": route.authority,
        "authority_name": authority.name if authority else None,
        "contact": authority.report_contact(route.category) if authority else None,
        "area": route.area.id if route.area else None,
        "area_name": route.area.name if route.area else None,
        "areas": [{"id": a.id, "name": a.name, "authority": a.authority, "tiers": list(a.tiers)}
                  for a in route.areas],
        "reasons": list(route.reasons),
    }


@click.command("route")
@click.option("--lat", type=float, required=True, help="Latitude in decimal degrees (WGS 84).")
@click.option("--lon", type=float, required=True,
              help="Longitude in decimal degrees (west is negative).")
@click.option("--category", "slug", required=True, metavar="SLUG",
              help="A category slug from rules/categories.toml.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def route(ctx: Ctx, lat: float, lon: float, slug: str, as_json: bool) -> None:
    """Where a fault report of a category at a point would go, and why.

    Exits 0 when an authority was found, 1 when none was (the point is not covered, no area
    there handles the category, or two areas claim it), 2 for an unknown category.

    \b
    Example: mailflow route --lat 51.1652 --lon -1.4497 --category pothole --json
    """
    from mailflow.core.geo import Point
    from mailflow.core.routing import UnknownCategory
    try:
        point = Point(lat, lon)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--lat/--lon") from None
    rules = ctx.site.rules.reports
    if rules is None:
        _usage_error(NO_RULES)
        return
    try:
        decision = rules.route(point, slug.strip().lower())
    except UnknownCategory as e:
        _usage_error(f"{e} (see `mailflow category list`)")
        return
    data = route_json(ctx, decision, lat, lon)
    if as_json:
        print_json(data)
    else:
        if data["authority"]:
            _say(f"{data['authority']} ({data['authority_name']}): send to "
                 f"{data['contact'] or 'no address'}", "bold green")
        elif not data["covered"]:
            _say("not covered: no area contains the point", "bold yellow")
        else:
            _say("no authority: " + ("ambiguous, a person must decide" if data["ambiguous"]
                                     else f"no area here handles the {data['tier']} tier"),
                 "bold yellow")
        for reason in data["reasons"]:
            _say(f"  - {reason}")
    sys.exit(EX_FOUND if decision.authority else EX_NONE)


@click.group("category")
def category() -> None:
    """The kinds of problem citizens can report (rules/categories.toml)."""


@category.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def category_list(ctx: Ctx, as_json: bool) -> None:
    """List the fault-report categories: slug, name, tier and keywords.

    \b
    Example: mailflow category list --json
    """
    rules = ctx.site.rules.reports
    cats = list(rules.categories.values()) if rules else []
    rows = [{"slug": c.slug, "name": c.name, "keywords": list(c.keywords), "tier": c.tier,
             "description": c.description,
             "address": f"report+{c.slug}@{ctx.site.domain}"} for c in cats]
    if as_json:
        print_json(rows)
        return
    if rules is None:
        _say(NO_RULES)
        return
    t = Table("slug", "name", "tier", "keywords")
    for r in rows:
        t.add_row(escape(r["slug"]), escape(r["name"]), escape(r["tier"]),
                  escape(", ".join(r["keywords"])))
    console.print(t)
    for problem in rules.problems():
        _say(f"warning: {problem}", "yellow")


@click.group("report")
def report() -> None:
    """Fault reports, as an admin puts them right."""


@report.command("correct")
@click.argument("thread_id", type=int)
@click.option("--category", "slug", default=None, metavar="SLUG",
              help="The right category (see `mailflow category list`).")
@click.option("--lat", type=float, default=None, help="The right place: latitude (WGS 84).")
@click.option("--lon", type=float, default=None, help="The right place: longitude (WGS 84).")
@click.option("--authority", default=None, metavar="SLUG",
              help="Where the areas name no single authority for it: this one.")
@click.option("--reason", default=None, help="Why (for the audit log and the report's history).")
@pass_ctx
def report_correct(ctx: Ctx, thread_id: int, slug: str | None, lat: float | None,
                   lon: float | None, authority: str | None, reason: str | None) -> None:
    """Put right a report's category or place. A report still waiting for details goes on
    (routed, confirmed, sent); an open one that now belongs to another authority is sent to
    it; `mailflow route` shows beforehand where a correction would send it.

    \b
    Example: mailflow report correct 41 --category fly-tipping --reason "it is dumped rubbish"
    Example: mailflow report correct 41 --lat 51.1652 --lon -1.4497
    """
    from mailflow.core.geo import Point
    if (lat is None) != (lon is None):
        _usage_error("give both --lat and --lon, or neither")
    if slug is None and lat is None and authority is None:
        _usage_error("nothing to correct: give --category, --lat/--lon or --authority")
    try:
        point = Point(lat, lon) if lat is not None and lon is not None else None
    except ValueError as e:       # Point checks its own range
        _usage_error(f"not a place on Earth: {e}")
        return
    ctx.done(ctx.moderation().correct_report(thread_id, category=slug, point=point,
                                             authority=authority, reason=reason))


def register(group: click.Group) -> None:
    """Put `route`, `category` and `report` on the `mailflow` group."""
    group.add_command(route)
    group.add_command(category)
    group.add_command(report)
