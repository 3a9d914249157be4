//! The kernel side of a network change: rtnetlink requests for links, VLANs, addresses,
//! routes and neighbours, the change itself ([`apply`], recording each step in an [`Undo`])
//! and its reversal ([`rollback`]). No policy here: when to apply, check, keep or undo is
//! decided in the parent module.

use crate::app::Shared;
use crate::error::ApiError;
use crate::system;
use ferry_api::NetworkPlan;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVlan, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// How long a gateway has to answer ARP or neighbour discovery.
pub const GATEWAY_WAIT: Duration = Duration::from_secs(5);
const MAIN_TABLE: u32 = 254;

/// Everything a change did, so that it can be taken back. Names, not indexes: a VLAN made
/// again gets a new index.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Undo {
    parent: String,
    parent_mtu: Option<u32>,
    parent_was_down: bool,
    vlan_created: Option<String>,
    target: String,
    target_mtu: Option<u32>,
    removed_addrs: Vec<(IpAddr, u8)>,
    added_addrs: Vec<(IpAddr, u8)>,
    removed_routes: Vec<SavedRoute>,
    added_routes: Vec<(IpAddr, String)>,
}

/// A default route taken away, with what it takes to put it back as it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedRoute {
    gateway: IpAddr,
    dev: String,
    protocol: u8,
    metric: Option<u32>,
}

/// A netlink connection for one operation.
pub struct Net {
    h: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Link {
    index: u32,
    pub name: String,
    mtu: u32,
    up: bool,
}

fn nl(what: &str) -> impl FnOnce(rtnetlink::Error) -> String + '_ {
    move |e| format!("{what}: {}", nl_text(&e))
}

/// The kernel's answer in its own words ("Operation not supported (os error 95)").
fn nl_text(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        e => e.to_string(),
    }
}

impl Net {
    pub fn open() -> Result<Net, ApiError> {
        let (conn, h, _) = rtnetlink::new_connection()
            .map_err(|e| ApiError::internal(format!("cannot open a netlink socket: {e}")))?;
        Ok(Net {
            h,
            task: tokio::spawn(conn),
        })
    }

    pub async fn links(&self) -> Result<Vec<Link>, String> {
        let msgs: Vec<LinkMessage> = self
            .h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing interfaces"))?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut l = Link {
                    index: m.header.index,
                    name: String::new(),
                    mtu: 0,
                    up: m.header.flags.contains(LinkFlags::Up),
                };
                for a in m.attributes {
                    match a {
                        LinkAttribute::IfName(n) => l.name = n,
                        LinkAttribute::Mtu(v) => l.mtu = v,
                        _ => {}
                    }
                }
                l
            })
            .collect())
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, String> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), String> {
        self.h
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(nl(&format!("setting the MTU to {mtu}")))
    }

    async fn set_up(&self, index: u32, up: bool) -> Result<(), String> {
        let m = LinkUnspec::new_with_index(index);
        let m = if up { m.up() } else { m.down() };
        self.h
            .link()
            .set(m.build())
            .execute()
            .await
            .map_err(nl("setting the interface up or down"))
    }

    /// Global addresses of an interface.
    async fn addrs(&self, index: u32) -> Result<Vec<(IpAddr, u8, AddressMessage)>, String> {
        let msgs: Vec<AddressMessage> = self
            .h
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index && m.header.scope == AddressScope::Universe)
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })?;
                Some((ip, m.header.prefix_len, m))
            })
            .collect())
    }

    /// Default routes of the main table, with their gateway and output interface.
    async fn defaults(&self, v6: bool) -> Result<Vec<(IpAddr, u32, RouteMessage)>, String> {
        let q = if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        let msgs: Vec<RouteMessage> = self
            .h
            .route()
            .get(q)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.destination_prefix_length == 0)
            .filter(|m| {
                let table = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(m.header.table));
                table == MAIN_TABLE
            })
            .filter_map(|m| {
                let gw = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                    _ => None,
                })?;
                let oif = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })?;
                Some((gw, oif, m))
            })
            .collect())
    }

    /// A default route via `gw`; `like` restores a saved one's protocol and metric.
    async fn add_default(
        &self,
        gw: IpAddr,
        oif: u32,
        like: Option<&SavedRoute>,
    ) -> Result<(), String> {
        let mut m = match gw {
            IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(g)
                .output_interface(oif)
                .build(),
            IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(g)
                .output_interface(oif)
                .build(),
        };
        if let Some(r) = like {
            m.header.protocol = RouteProtocol::from(r.protocol);
            if let Some(metric) = r.metric {
                m.attributes.push(RouteAttribute::Priority(metric));
            }
        }
        self.h
            .route()
            .add(m)
            .execute()
            .await
            .map_err(nl(&format!("adding the default route via {gw}")))
    }

    /// Whether `gw` answers on `index`: a datagram makes the kernel resolve it, and the
    /// neighbour table says whether it did.
    pub async fn gateway_answers(&self, index: u32, gw: IpAddr) -> Result<bool, String> {
        let family = if gw.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let find = || async {
            let msgs: Vec<_> = self
                .h
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing neighbours"))?;
            Ok::<_, String>(msgs.into_iter().find(|m| {
                m.header.ifindex == index
                    && m.attributes.iter().any(|a| match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                            IpAddr::V4(*ip) == gw
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                            IpAddr::V6(*ip) == gw
                        }
                        _ => false,
                    })
            }))
        };
        // An entry from an earlier configuration must not answer for this one.
        if let Some(old) = find().await? {
            let _ = self.h.neighbours().del(old).execute().await;
        }
        let bind: std::net::SocketAddr = if gw.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = tokio::net::UdpSocket::bind(bind)
            .await
            .map_err(|e| format!("probing the gateway: {e}"))?;
        let start = tokio::time::Instant::now();
        let mut sent = false;
        while start.elapsed() < GATEWAY_WAIT {
            // The discard port: nothing answers it, but the kernel must resolve the gateway
            // to send. A fresh IPv6 address may still be tentative: keep trying.
            if !sent {
                sent = sock.send_to(b"ferry", (gw, 9)).await.is_ok();
            }
            if let Some(n) = find().await? {
                match n.header.state {
                    NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp => return Ok(true),
                    NeighbourState::Failed => return Ok(false),
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(false)
    }
}

/// Apply `plan`, recording every step in `undo`. Returns the target interface's index.
pub async fn apply(
    app: &Shared,
    net: &Net,
    plan: &NetworkPlan,
    undo: &mut Undo,
) -> Result<u32, String> {
    let parent = net
        .link(&plan.interface)
        .await?
        .ok_or_else(|| format!("interface: no interface {} here", plan.interface))?;
    undo.parent = parent.name.clone();
    if let Some(mtu) = plan.mtu.filter(|m| *m != parent.mtu) {
        undo.parent_mtu = Some(parent.mtu);
        net.set_mtu(parent.index, mtu).await?;
    }
    if !parent.up {
        undo.parent_was_down = true;
        net.set_up(parent.index, true).await?;
    }
    let target_name = plan.target();
    undo.target = target_name.clone();
    let target = match (plan.vlan, net.link(&target_name).await?) {
        (_, Some(t)) => {
            if let Some(mtu) = plan.mtu.filter(|m| *m != t.mtu && t.index != parent.index) {
                undo.target_mtu = Some(t.mtu);
                net.set_mtu(t.index, mtu).await?;
            }
            if !t.up {
                net.set_up(t.index, true).await?;
            }
            t.index
        }
        (Some(id), None) => {
            undo.vlan_created = Some(target_name.clone());
            let msg = LinkVlan::new(&target_name, parent.index, id).up().build();
            net.h.link().add(msg).execute().await.map_err(|e| {
                format!(
                    "VLAN {id} on {}: this kernel cannot make VLAN interfaces (no 802.1Q \
                     support, module 8021q?): {}",
                    plan.interface,
                    nl_text(&e)
                )
            })?;
            net.link(&target_name)
                .await?
                .ok_or_else(|| format!("the VLAN interface {target_name} did not appear"))?
                .index
        }
        (None, None) => return Err(format!("interface {target_name} disappeared")),
    };
    if plan.dhcp {
        system::hook(app, "dhcp", &[("FERRY_INTERFACE", target_name.clone())])
            .await
            .map_err(|e| e.message)?;
        return Ok(target);
    }
    for (cidr, gw) in [
        plan.ipv4.map(|(c, g)| (c, g.map(IpAddr::V4))),
        plan.ipv6.map(|(c, g)| (c, g.map(IpAddr::V6))),
    ]
    .into_iter()
    .flatten()
    {
        let v6 = cidr.addr.is_ipv6();
        // The family's default routes go first, recorded: taking an address away would
        // take a route through it along silently, and the undo could not bring it back.
        // A static configuration's default route is the one it names, or none.
        let names = net.links().await?;
        let name_of = |i: u32| {
            names
                .iter()
                .find(|l| l.index == i)
                .map(|l| l.name.clone())
                .unwrap_or_default()
        };
        for (old_gw, oif, msg) in net.defaults(v6).await? {
            undo.removed_routes.push(SavedRoute {
                gateway: old_gw,
                dev: name_of(oif),
                protocol: u8::from(msg.header.protocol),
                metric: msg.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Priority(p) => Some(*p),
                    _ => None,
                }),
            });
            net.h
                .route()
                .del(msg)
                .execute()
                .await
                .map_err(nl(&format!("removing the default route via {old_gw}")))?;
        }
        for (ip, prefix, msg) in net.addrs(target).await? {
            if ip.is_ipv6() == v6 && (ip, prefix) != (cidr.addr, cidr.prefix) {
                undo.removed_addrs.push((ip, prefix));
                net.h
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(nl(&format!("removing {ip}/{prefix}")))?;
            }
        }
        if !net
            .addrs(target)
            .await?
            .iter()
            .any(|(ip, p, _)| (*ip, *p) == (cidr.addr, cidr.prefix))
        {
            undo.added_addrs.push((cidr.addr, cidr.prefix));
            net.h
                .address()
                .add(target, cidr.addr, cidr.prefix)
                .execute()
                .await
                .map_err(nl(&format!("adding {}/{}", cidr.addr, cidr.prefix)))?;
        }
        if let Some(gw) = gw {
            undo.added_routes.push((gw, target_name.clone()));
            net.add_default(gw, target, None).await?;
        }
    }
    Ok(target)
}

/// Take back what `undo` recorded, newest first; goes on past failures and lists them.
pub async fn rollback(net: &Net, undo: &Undo) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };
    let links = match net.links().await {
        Ok(l) => l,
        Err(e) => return vec![e],
    };
    let index = |n: &str| links.iter().find(|l| l.name == n).map(|l| l.index);
    for (gw, dev) in &undo.added_routes {
        if let (Some(i), Ok(routes)) = (index(dev), net.defaults(gw.is_ipv6()).await) {
            for (g, oif, msg) in routes {
                if g == *gw && oif == i {
                    note(
                        net.h
                            .route()
                            .del(msg)
                            .execute()
                            .await
                            .map_err(nl("removing a route")),
                    );
                }
            }
        }
    }
    if let Some(t) = index(&undo.target) {
        if let Ok(addrs) = net.addrs(t).await {
            for (ip, p, msg) in addrs {
                if undo.added_addrs.contains(&(ip, p)) {
                    note(
                        net.h
                            .address()
                            .del(msg)
                            .execute()
                            .await
                            .map_err(nl("removing an address")),
                    );
                }
            }
        }
        for (ip, p) in &undo.removed_addrs {
            note(
                net.h
                    .address()
                    .add(t, *ip, *p)
                    .execute()
                    .await
                    .map_err(nl(&format!("restoring {ip}/{p}"))),
            );
        }
        if let Some(m) = undo.target_mtu {
            note(net.set_mtu(t, m).await);
        }
    }
    if let Some(v) = undo.vlan_created.as_deref().and_then(index) {
        note(
            net.h
                .link()
                .del(v)
                .execute()
                .await
                .map_err(nl("removing the VLAN")),
        );
    }
    if let Some(p) = index(&undo.parent) {
        if let Some(m) = undo.parent_mtu {
            note(net.set_mtu(p, m).await);
        }
        if undo.parent_was_down {
            note(net.set_up(p, false).await);
        }
    }
    for r in &undo.removed_routes {
        if let Some(i) = index(&r.dev) {
            note(net.add_default(r.gateway, i, Some(r)).await);
        }
    }
    errors
}
